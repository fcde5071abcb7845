"""Search over reasoning steps: LLaMA-O1's MCTS (mcts), chain / best-of-N / beam / DVTS (beam), all over the tree
arrays (tree) and the StepModel protocol (step_model; lm puts the language model behind it); solve is the job."""

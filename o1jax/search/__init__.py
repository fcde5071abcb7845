"""Search policies over the batched sampler and scorer (chain now; MCTS, beam, best-of-N, DVTS as they land)."""

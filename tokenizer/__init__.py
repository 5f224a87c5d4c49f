"""MedEIR's 52,543-token lower-cased WordPiece tokenizer: `python -m tokenizer.train` builds it from the corpus,
`python -m tokenizer.fragmentation` measures it against bert-base-uncased. The trained files in this folder load with
`AutoTokenizer.from_pretrained("tokenizer")`."""

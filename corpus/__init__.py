"""MedEIR data build: real medical and general text from registry packages, turned into the corpus, contrastive
pairs, held-out benchmarks and manifest described in docs/data-contract.md. Entry point: `python -m corpus.build`."""

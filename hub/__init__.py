"""Packaging MedEIR for the Hub: sentence-transformers files, the Inference Endpoints handler, publishing."""

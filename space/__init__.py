"""The MedEIR Gradio demo (`python -m space.app`); `python -m hub.publish space` turns this folder into a Space."""

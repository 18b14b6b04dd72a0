"""The optional torch side (pip install edgec[torch]): export, torch-side importance scores, fine-tuning, QAT."""

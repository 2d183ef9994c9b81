"""Evaluation: MRAMG statistical metrics (`metrics`) and BERTScore with the Flax encoder (`bertscore`)."""

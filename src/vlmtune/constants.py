"""Constants shared by the data pipeline, the model's own loss and the trainer."""

IGNORE_INDEX = -100  # a label position that is not trained (prompt, vision tokens, padding, sample ends)

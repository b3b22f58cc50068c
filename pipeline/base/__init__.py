"""The bottom layer of the pipeline: the home folder, the vocabulary and splits, coordinate frames, devices and mixed
precision, process lifelines and file digests. It imports nothing of the project."""

"""Images in: DICOM decoding, the decode-once uint8 cache, the dataset over it, and the rejects of bad input."""

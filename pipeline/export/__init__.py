"""Data out: `write.export` of a mining run in one of `write.FORMATS` (one module per format, owning its writer and
its write-time check), and the review loop's way back (`review`) through the COCO and Label Studio readers."""

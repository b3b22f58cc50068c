"""A downstream detector trained on one mining run's boxes (issue #13): `harvest detector train|predict|evaluate`.

- `pipeline/config/detector.py`: `DetectorConfig` (configs/detector*.yaml)
- `data.py`: the run's boxes on the classifier's training images (filters, reviewed boxes)
- `model.py`: Faster R-CNN on a ResNet-FPN initialised from the run's classifier; anchors fitted to the boxes
- `train.py`: resumable training, registered in `models` (stage 'detector', parent = the classifier)
- `predict.py`: `mined_boxes` rows with method 'detector'
- `evaluate.py`: detector vs mined boxes on held-out phantom truth (COCO AP, Wang/Cai Acc, bootstrap CIs)

Modules are imported where used (torch, torchvision, pycocotools).
"""

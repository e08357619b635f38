"""The transfer datasets: builders of the embedded ones and their registration with detectron2.

:mod:`.scenes` (Fashion-MNIST scenes) and :mod:`.deepforest` (DeepForest tree-crown tiles) write
COCO- or VOC-format folders without detectron2; :mod:`.register` registers the folders a config
names (``MOCO.DATASETS``) and needs it. Nothing is registered on import.
"""

"""The toy base model, pretrained by the pipeline on real faces shipped in wheels (docs/pretrain.md).

- :mod:`.faces`: the real faces (LFW subset, astronaut, Grace Hopper) and the held-out split;
- :mod:`.augment`, :mod:`.artifacts`, :mod:`.captions`: training views, the planted artifact, captions;
- :mod:`.codec`: the lossless pixel codec, an ``AutoencoderTiny`` the SD3 pipeline accepts;
- :mod:`.model`, :mod:`.train`: the SD3 transformer built in code and the rectified-flow loop;
- :mod:`.artifact_detector`: the planted-artifact CNN (an evaluation measure, never a reward);
- :mod:`.evaluate`: face hit rate and artifact rate of samples;
- :mod:`.stage`: ``portraitgen pretrain`` (content-keyed reuse, atomic outputs, MLflow).
"""

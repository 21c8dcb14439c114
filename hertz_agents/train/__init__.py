"""Training and fine-tuning: the codec phase, the AR phase, and the small CPU model's recipe.

Entry points:

* ``hertz-agents train codec|ar|small`` (:func:`hertz_agents.train.cli.add_train_commands`),
  also ``python -m hertz_agents.train.cli`` under ``torchrun``;
* :func:`hertz_agents.train.codec_trainer.train_codec` and
  :func:`hertz_agents.train.ar_trainer.train_ar`, given a recipe from
  :mod:`hertz_agents.train.config`;
* :func:`hertz_agents.train.small.run_small`, the whole ``hertz-small`` recipe.

Data: :mod:`hertz_agents.train.data` (segments of a folder of recordings) and
:mod:`hertz_agents.train.synth` (synthetic conversations). See docs/training.md.
"""

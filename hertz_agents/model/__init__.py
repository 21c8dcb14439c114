"""The Hertz model: the autoregressive transformer, the resynthesizer and their parts."""

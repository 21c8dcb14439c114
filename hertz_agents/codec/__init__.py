"""The streaming audio codec: waveforms to latents and back."""

"""What a latent does: interventions on SAE latents spliced into the pLM (``intervene``), their
effect on the model's own predictions (``effects``), every latent's output effect (``output_effect``)
and in-silico saturation mutagenesis of latent activations (``scan``; command: ``scan_command``)."""

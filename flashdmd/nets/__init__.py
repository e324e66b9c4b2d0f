"""Networks: one denoiser interface, family adapters, text encoding, VAE, discriminator, reward model."""

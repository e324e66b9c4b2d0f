"""Infrastructure under every job: distributed setup, MLflow tracking and its writer process, the
reproducibility bundle."""

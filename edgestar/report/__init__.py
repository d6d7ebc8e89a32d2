"""Human-readable reports rendered from manifests alone."""

"""Online learning of drafters from feedback records: losses, online updates, ensembles."""

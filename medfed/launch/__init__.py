"""Process control: a private SuperLink for simulations, SuperLink/SuperNode processes for deployments, the thin
Flower app bundle, and cleaning up every process a session started."""

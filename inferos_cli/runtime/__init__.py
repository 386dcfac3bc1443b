"""Model resolution, conversion, sessions, the engine, the scheduler and telemetry."""

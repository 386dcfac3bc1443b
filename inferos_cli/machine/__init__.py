"""The machine inferos runs on: RSS (the one reader), host facts and devices, utilisation monitors and their
sampling loops, memory pressure."""

"""sottovoce host tool (laptop): flash, devices, profile, cloud fallback."""

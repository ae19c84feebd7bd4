"""From URL rows to a round's plan: ``partition`` groups rows by server and cuts batches, ``previous`` and
``snapshot`` match a monthly snapshot against earlier datasets, ``stale_images`` moves aside partitions a new
manifest dropped, ``profiling`` probes every server, ``server_memory`` reads what earlier runs learned, and
``schedule`` plans each round's batches and lanes."""

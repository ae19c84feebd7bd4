"""From a downloaded body to the stored image: ``process`` (decode, orient, downscale, encode) and the
per-process memory budget of decodes (``decode_budget``)."""

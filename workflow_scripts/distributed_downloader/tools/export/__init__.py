"""Training-ready exports of the image store (issue #19): the ``export_webdataset`` tool.

The store stays the source of truth; an export is a derived copy in the layout a trainer reads
(WebDataset tar shards). One module per idea:

* ``settings``: the ``tools_parameters.export_*`` keys and the export folder;
* ``shard``: one tar shard written atomically and hashed as it is written;
* ``samples``: one store row as one WebDataset sample (image member + JSON member);
* ``selection``: the optional row filters (minimum side, full license);
* ``plan``: the deterministic order of a stream's rows (optionally a seeded shuffle);
* ``state``: the per-stream progress that makes an export resumable, and the ``shards.json`` index;
* ``stream``: the loop that cuts one stream's rows into shards, resuming after its committed ones;
* ``tool``: the filter / runner registered as ``export_webdataset``.
"""

"""The files of a run on disk: atomic writes, parquet schemas, batch writers, completion markers, rows.

``files``: atomic writes, the image store's schemas and file names, ``StreamingParquet``, markers;
``batch_parts``: a batch's committed success files and the durable parts of a batch in progress;
``jsonfiles``: reading the small JSON files of a run that may not be there yet.
"""

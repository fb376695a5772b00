"""pyACT's own files into this project's formats: Keras ``.h5`` weights into checkpoints
(``keras_weights``: ``pyact convert-keras``) and TFRecords into shards (``tfrecords``:
``pyact convert-tfrecords``).

May import: ``errors``, ``config``, ``model``, ``io``, ``data`` and ``training`` (the
checkpoint format).
"""

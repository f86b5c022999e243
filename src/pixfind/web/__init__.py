"""``pixfind serve``: a web page and a JSON API over one index, with the model loaded once.

* :mod:`.app`: the routes (page, search by text / image / stored vector, info, thumbnails,
  originals) and :func:`~.app.create_app`, which wraps them in the checks below;
* :mod:`.service`: what the routes ask of the index (serialised), thumbnails and their cache,
  upload decoding;
* :mod:`.paths`: which file a request names, opened once and checked against its index row;
* :mod:`.access`: who may ask (loopback Host names, other sites' pages, passwords);
* :mod:`.middleware`: the upload size cap and the headers on every answer;
* :mod:`.transport`: slow clients timed out, connections capped (on uvicorn's h11 protocol);
* :mod:`.server`: the socket, uvicorn, and the announcement :mod:`pixfind.remote` reads.

docs/web.md says what each guarantees and how it was attacked. Importing this package imports
nothing: the command line loads it only for ``pixfind serve``.
"""

"""Indexing: folders in, rows out.

:mod:`.scan` lists image files and tells whether a stored file is known to be gone;
:mod:`.content` reads a file once and identifies its bytes; :mod:`.decode` turns bytes into an
RGB image behind its guards; :mod:`.plan` decides what each file needs; :mod:`.pipeline` holds
the stages (decode one file, embed a batch, write rows) that :mod:`.runner` composes on this
machine; :mod:`.report` is what a run tells its caller.
"""

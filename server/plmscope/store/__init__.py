"""Stage 5: the atlas on disk.  ``schema`` is the one definition shared by the build (writer)
and the server (reader); ``writer`` and ``reader`` hold all the SQL of the project."""

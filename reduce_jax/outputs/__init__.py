"""What a run leaves behind: the typed result and its JSON (`summary`), the files of a
workdir (`report`) and the figures (`plots`)."""

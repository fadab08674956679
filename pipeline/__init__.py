"""The top floor: the reference build, which orchestrates every stage (training -> evaluation ->
export) into one directory. It imports training/ and export/; nothing imports it."""

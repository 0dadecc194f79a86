"""``rollstream ui``: a server-rendered rollout viewer over one topic prefix (index, pages, charts)."""

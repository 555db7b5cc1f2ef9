"""Data preprocessing: raw videos and images → scene clips, filter scores, captions and the meta JSON."""

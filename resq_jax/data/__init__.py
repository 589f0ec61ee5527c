"""Text for calibration and evaluation: built-in texts and files (texts), their download and cache (fetch),
plain text from Wikipedia XML and the news corpus (extract), token windows (windows).
"""

"""One simulated GPU server: loads one model, serves up to 4 audio streams over WebSocket."""

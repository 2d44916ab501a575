"""When bytes move: the slot ring, the copy streams per link, and the events between them."""

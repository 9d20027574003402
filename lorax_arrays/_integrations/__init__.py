"""Integrations with other libraries' weight types (qwix's quantised arrays),
registered through the core's hooks; the core never imports them."""

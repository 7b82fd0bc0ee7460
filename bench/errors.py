class UserError(Exception):
    """A mistake the user can fix (bad flag, unknown name, missing or corrupt data).

    The CLI prints its message as one line on stderr and exits with code 2, without a traceback.
    """

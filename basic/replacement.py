"""Replacing finished outputs without ever losing them (docs/training.md, 'Overwriting a run').

`--overwrite 1` (the trainer's run folder, the tester's results folder) deletes nothing up front. The files
the program owns in its folder are moved aside into a hidden folder inside it, the new attempt writes in
their place, and the previous files are deleted only when the new attempt reaches its commit point (the
trainer: its first checkpoint; the tester: metrics.json). An exception before that point puts them back
byte for byte and removes what the attempt wrote. Files the program does not own stay where they are.

Every step is a rename (atomic on one file system), ordered so that a kill at any moment leaves the folder
in one of these states, which `recover` (called first by the next start of the program) resolves:

  on disk                                   meaning                                   recover
  <aside>.moving/                           being set aside, nothing new written      move its files back
  <aside>/, commit mark absent              the new attempt before its commit point   remove the new files, move back
  <aside>/, commit mark present             committed, the previous files not deleted delete <aside>
  <aside>.restoring/                        being put back, new files removed         move the rest back
  <aside>.discard/                          being deleted                             delete it

The commit mark is a file only the new attempt can have written (the previous ones are aside): the trainer's
checkpoints, the tester's metrics.json. Call these methods from one process (the trainer's main rank).
"""
import contextlib
import logging
import os
import shutil

logger = logging.getLogger('mlcmr')


class Replacement:
    """The owned files of `directory` kept aside (in `directory/<aside>`) while a new attempt replaces them.

    owned(name) -> bool: the files of the folder that the program writes (only plain files directly in it).
    committed(directory) -> bool: whether the new attempt reached its commit point (see the module docstring).
    """

    def __init__(self, directory, owned, committed, aside='.previous', what='outputs'):
        self.directory, self.owned, self.committed, self.what = directory, owned, committed, what
        self.aside = os.path.join(directory, aside)
        self.pending = False            # the previous files are aside, the new attempt has not committed

    def _stage(self, state):
        return f'{self.aside}.{state}' if state else self.aside

    def owned_files(self, directory=None):
        directory = directory or self.directory
        if not os.path.isdir(directory):
            return []
        return sorted(n for n in os.listdir(directory)
                      if self.owned(n) and os.path.isfile(os.path.join(directory, n)))

    def _remove_new_files(self):
        for name in self.owned_files():
            os.remove(os.path.join(self.directory, name))

    # ---- the steps ----
    def set_aside(self):
        """Move the owned files into <aside>; returns their names (none: nothing to protect, nothing done)."""
        names = self.owned_files()
        if not names:
            return []
        moving = self._stage('moving')
        os.makedirs(moving)
        try:
            for name in names:
                os.replace(os.path.join(self.directory, name), os.path.join(moving, name))
        except Exception:           # e.g. a permission error half-way: put back what moved
            self._put_back('moving')
            raise
        os.replace(moving, self.aside)
        self.pending = True
        logger.info('kept the previous %s aside in %s until the new ones are certain (%s)', self.what, self.aside,
                    ', '.join(names))
        return names

    def commit(self):
        """The new attempt reached its commit point: delete the previous files. A no-op when none are aside."""
        if not self.pending:
            return False
        self._discard()
        logger.info('removed the previous %s (--overwrite 1)', self.what)
        return True

    def restore(self):
        """Abandon the new attempt before its commit point: remove its files, put the previous ones back."""
        self._restore()
        logger.warning('the new %s stopped before they were certain: the previous %s are back in %s', self.what,
                       self.what, self.directory)

    def recover(self):
        """Finish or undo a replacement a kill interrupted (the table in the module docstring); returns a line
        saying what was done, or None when there was nothing to do."""
        if os.path.isdir(self._stage('discard')):
            shutil.rmtree(self._stage('discard'))
            return f'removed the previous {self.what}, which a kill left half-deleted after the new ones committed'
        if os.path.isdir(self._stage('moving')):
            self._put_back('moving')
            return f'put back the previous {self.what}, which a kill left half set aside'
        if os.path.isdir(self._stage('restoring')):
            self._put_back('restoring')
            return f'put back the previous {self.what}, which a kill left half restored'
        if not os.path.isdir(self.aside):
            return None
        if self.committed(self.directory):
            self._discard()
            return f'removed the previous {self.what}: the new ones had reached their commit point before a kill'
        self._restore()
        return f'put back the previous {self.what}: the new ones were stopped before their commit point'

    def _discard(self):
        discard = self._stage('discard')
        os.replace(self.aside, discard)
        shutil.rmtree(discard)
        self.pending = False

    def _restore(self):
        self._remove_new_files()
        os.replace(self.aside, self._stage('restoring'))
        self._put_back('restoring')
        self.pending = False

    def _put_back(self, state):
        """Move every file of <aside>.<state> back into the folder, then remove the empty stage folder."""
        stage = self._stage(state)
        for name in sorted(os.listdir(stage)):
            os.replace(os.path.join(stage, name), os.path.join(self.directory, name))
        os.rmdir(stage)

    @contextlib.contextmanager
    def attempt(self, replace):
        """The block of a new attempt. replace=True: set the owned files aside first; an exception (Ctrl-C
        included) escaping the block before `commit` puts them back."""
        if replace:
            self.set_aside()
        try:
            yield self
        except BaseException:
            if self.pending:
                self.restore()
            raise

package server

import (
	"runtime"

	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/cfs/proto"
)

// asRoot is whether the server runs as root, and so can take on a
// caller's filesystem credentials (and must: as root it could do
// anything).
var asRoot = unix.Geteuid() == 0

// The agent's own credentials, restored after a request.
var (
	ownUID, ownGID = unix.Geteuid(), unix.Getegid()
	ownGroups      = func() []int {
		g, _ := unix.Getgroups()
		return g
	}()
)

// asCaller runs f with the filesystem credentials of c (fsuid, fsgid and
// supplementary groups) on a locked OS thread, so the node's kernel
// checks the caller's permissions for what f does and what f creates is
// the caller's. Root callers, and a server that is not root, run f as
// they are.
//
// The credentials are per thread: the goroutine is locked to its thread
// until they are restored, and if restoring fails the thread is not
// unlocked, so the runtime ends it with the goroutine rather than reuse
// it. (The runtime never clones a new thread from a locked one.)
func asCaller(c *proto.Cred, f func() unix.Errno) unix.Errno {
	if c == nil || !asRoot || c.UID == 0 {
		return f()
	}
	runtime.LockOSThread()
	groups := make([]int, len(c.Groups))
	for i, g := range c.Groups {
		groups[i] = int(g)
	}
	ok := unix.Setgroups(groups) == nil
	if ok {
		unix.SetfsgidRetGid(int(c.GID))
		unix.SetfsuidRetUid(int(c.UID))
		// setfsuid answers the previous value, never an error: ask
		// again to know it took.
		uid, _ := unix.SetfsuidRetUid(-1)
		gid, _ := unix.SetfsgidRetGid(-1)
		ok = uid == int(c.UID) && gid == int(c.GID)
	}
	errno := unix.EPERM
	if ok {
		errno = f()
	}
	unix.SetfsuidRetUid(ownUID)
	unix.SetfsgidRetGid(ownGID)
	uid, _ := unix.SetfsuidRetUid(-1)
	gid, _ := unix.SetfsgidRetGid(-1)
	if uid == ownUID && gid == ownGID && unix.Setgroups(ownGroups) == nil {
		runtime.UnlockOSThread()
	}
	return errno
}

// runAs is asCaller for a request that answers a message.
func runAs(c *proto.Cred, f func() (unix.Errno, proto.Msg)) (unix.Errno, proto.Msg) {
	var m proto.Msg
	errno := asCaller(c, func() unix.Errno {
		var errno unix.Errno
		errno, m = f()
		return errno
	})
	if errno != 0 {
		return errno, nil
	}
	return 0, m
}

// switched reports whether requests for c run with c's credentials
// (asCaller), so the node's kernel checks permissions and ownership
// itself.
func switched(c *proto.Cred) bool { return c != nil && asRoot && c.UID != 0 }

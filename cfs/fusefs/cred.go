package fusefs

import (
	"bytes"
	"context"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/onebox-project/onebox/cfs/proto"
)

// The owning node performs a request with the caller's filesystem
// credentials (cfs/server asCaller), so it needs the caller's
// supplementary groups too; FUSE passes only the uid, the gid and the
// pid. The groups are read from /proc/PID/status and kept for
// CacheTimeout per (pid, uid, gid), the time the kernel keeps
// attributes: a program changing its groups is seen that late, and a
// program creating many files pays for one read. Root needs none (the
// node acts as root for it).

type credKey struct{ pid, uid, gid uint32 }

type credEntry struct {
	groups []uint32
	at     time.Time
}

// maxCreds bounds the cache; it is emptied when full.
const maxCreds = 4096

var creds struct {
	mu sync.Mutex
	m  map[credKey]credEntry // guarded by mu
}

// nobody is the overflow user and group (65534): the credentials of a
// request whose caller is not known, so the owning node acts with no
// privilege rather than as root.
const nobody = 65534

// callerCred is the user, group and supplementary groups of the process
// behind a request.
func callerCred(ctx context.Context) proto.Cred {
	c, ok := fuse.FromContext(ctx)
	if !ok {
		return proto.Cred{UID: nobody, GID: nobody}
	}
	cr := proto.Cred{UID: c.Uid, GID: c.Gid}
	if c.Uid == 0 || c.Pid == 0 {
		return cr
	}
	k := credKey{c.Pid, c.Uid, c.Gid}
	creds.mu.Lock()
	e, ok := creds.m[k]
	creds.mu.Unlock()
	if ok && time.Since(e.at) < CacheTimeout {
		cr.Groups = e.groups
		return cr
	}
	groups := procGroups(c.Pid)
	creds.mu.Lock()
	if creds.m == nil || len(creds.m) >= maxCreds {
		creds.m = map[credKey]credEntry{}
	}
	creds.m[k] = credEntry{groups: groups, at: time.Now()}
	creds.mu.Unlock()
	cr.Groups = groups
	return cr
}

// procGroups reads the supplementary groups of process (or thread) pid;
// none if it is gone.
func procGroups(pid uint32) []uint32 {
	b, err := os.ReadFile("/proc/" + strconv.FormatUint(uint64(pid), 10) + "/status")
	if err != nil {
		return nil
	}
	return parseGroups(b)
}

// parseGroups finds the "Groups:" line of a /proc/PID/status.
func parseGroups(status []byte) []uint32 {
	_, rest, ok := bytes.Cut(status, []byte("\nGroups:"))
	if !ok {
		return nil
	}
	line, _, _ := bytes.Cut(rest, []byte("\n"))
	var out []uint32
	for _, f := range bytes.Fields(line) {
		g, err := strconv.ParseUint(string(f), 10, 32)
		if err != nil {
			return nil
		}
		if len(out) == proto.MaxGroups {
			break
		}
		out = append(out, uint32(g))
	}
	return out
}

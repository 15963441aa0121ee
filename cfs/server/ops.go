package server

import (
	"encoding/binary"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/cfs/proto"
)

// resolveHow is how every path is resolved: beneath the export's root, no
// /proc magic links.
const resolveHow = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS

// openFlags are the open(2) flags a client may ask for; anything else
// (O_PATH, O_TMPFILE, O_DIRECT, ...) is dropped.
const openFlags = unix.O_ACCMODE | unix.O_APPEND | unix.O_TRUNC | unix.O_SYNC | unix.O_DSYNC | unix.O_NOATIME | unix.O_EXCL

func (cn *conn) dispatch(op proto.Op, b []byte) (unix.Errno, proto.Msg) {
	s := cn.s
	switch op {
	case proto.OpExports:
		if proto.Unmarshal(b, &proto.Empty{}) != nil {
			return unix.EINVAL, nil
		}
		var l proto.ExportList
		for _, n := range s.names {
			l.Exports = append(l.Exports, proto.ExportInfo{Name: n, ReadOnly: s.exports[n].ReadOnly})
		}
		return 0, &l
	case proto.OpGetattr:
		var r proto.PathReq
		e, errno := cn.pathReq(b, &r, false)
		if errno != 0 {
			return errno, nil
		}
		fd, errno := e.open(r.Path, unix.O_PATH, 0)
		if errno != 0 {
			return errno, nil
		}
		defer unix.Close(fd)
		return fstat(fd)
	case proto.OpStatfs:
		var r proto.PathReq
		e, errno := cn.pathReq(b, &r, false)
		if errno != 0 {
			return errno, nil
		}
		var st unix.Statfs_t
		if err := unix.Fstatfs(e.root, &st); err != nil {
			return errnoOf(err), nil
		}
		return 0, &proto.Statfs{Blocks: st.Blocks, Bfree: st.Bfree, Bavail: st.Bavail, Files: st.Files, Ffree: st.Ffree,
			Bsize: uint32(st.Bsize), NameLen: uint32(st.Namelen), Frsize: uint32(st.Frsize)}
	case proto.OpOpendir:
		var r proto.PathReq
		e, errno := cn.pathReq(b, &r, false)
		if errno != 0 {
			return errno, nil
		}
		fd, errno := e.open(r.Path, unix.O_RDONLY|unix.O_DIRECTORY, 0)
		if errno != 0 {
			return errno, nil
		}
		id, errno := cn.addHandle(&handle{fd: fd, exp: e, dir: true})
		if errno != 0 {
			unix.Close(fd)
			return errno, nil
		}
		return 0, &proto.HandleReply{Handle: id}
	case proto.OpReaddir:
		var r proto.HandleReq
		if proto.Unmarshal(b, &r) != nil {
			return unix.EINVAL, nil
		}
		h, release, errno := cn.acquire(r.Handle)
		if errno != 0 {
			return errno, nil
		}
		defer release()
		if !h.dir {
			return unix.ENOTDIR, nil
		}
		return readdir(h)
	case proto.OpOpen, proto.OpCreate:
		var r proto.OpenReq
		if proto.Unmarshal(b, &r) != nil {
			return unix.EINVAL, nil
		}
		e, errno := cn.export(r.Export, r.Path, false)
		if errno != 0 {
			return errno, nil
		}
		return cn.open(e, &r, op == proto.OpCreate)
	case proto.OpRead, proto.OpWrite, proto.OpFsync:
		var r proto.IOReq
		if proto.Unmarshal(b, &r) != nil {
			return unix.EINVAL, nil
		}
		h, release, errno := cn.acquire(r.Handle)
		if errno != 0 {
			return errno, nil
		}
		defer release()
		if h.dir {
			return unix.EISDIR, nil
		}
		if testHookIO != nil {
			testHookIO()
		}
		return fileIO(op, h, &r)
	case proto.OpClose:
		var r proto.HandleReq
		if proto.Unmarshal(b, &r) != nil {
			return unix.EINVAL, nil
		}
		return cn.removeHandle(r.Handle), nil
	case proto.OpFstat:
		var r proto.HandleReq
		if proto.Unmarshal(b, &r) != nil {
			return unix.EINVAL, nil
		}
		h, release, errno := cn.acquire(r.Handle)
		if errno != 0 {
			return errno, nil
		}
		defer release()
		return fstat(h.fd)
	case proto.OpSetattr:
		var r proto.SetattrReq
		if proto.Unmarshal(b, &r) != nil {
			return unix.EINVAL, nil
		}
		e, errno := cn.export(r.Export, r.Path, true)
		if errno != 0 {
			return errno, nil
		}
		return cn.setattr(e, &r)
	case proto.OpReadlink:
		var r proto.PathReq
		e, errno := cn.pathReq(b, &r, false)
		if errno != 0 {
			return errno, nil
		}
		buf := make([]byte, proto.MaxPath+1)
		var n int
		errno = e.atParent(r.Path, nil, func(dfd int, name string) (err error) {
			n, err = unix.Readlinkat(dfd, name, buf)
			return err
		})
		if errno != 0 {
			return errno, nil
		}
		if n > proto.MaxPath {
			return unix.ENAMETOOLONG, nil
		}
		return 0, &proto.Data{Data: buf[:n]}
	case proto.OpSymlink:
		var r proto.SymlinkReq
		if proto.Unmarshal(b, &r) != nil {
			return unix.EINVAL, nil
		}
		e, errno := cn.export(r.Export, r.Path, true)
		if errno != 0 {
			return errno, nil
		}
		errno = e.atDir(r.Path, r.DirDev, r.DirIno, &r.Caller, func(dfd int, name string) error {
			if err := unix.Symlinkat(r.Target, dfd, name); err != nil {
				return err
			}
			if asRoot && !switched(&r.Caller) && r.Caller.GID != 0 {
				_ = unix.Fchownat(dfd, name, int(r.Caller.UID), int(r.Caller.GID), unix.AT_SYMLINK_NOFOLLOW)
			}
			return nil
		})
		if errno != 0 {
			return errno, nil
		}
		fd, errno := e.open(r.Path, unix.O_PATH, 0)
		if errno != 0 {
			return errno, nil
		}
		defer unix.Close(fd)
		return fstat(fd)
	case proto.OpMkdir:
		var r proto.OpenReq
		if proto.Unmarshal(b, &r) != nil {
			return unix.EINVAL, nil
		}
		e, errno := cn.export(r.Export, r.Path, true)
		if errno != 0 {
			return errno, nil
		}
		var rep proto.EntryReply
		errno = e.atDir(r.Path, r.DirDev, r.DirIno, &r.Caller, func(dfd int, name string) error {
			if err := unix.Mkdirat(dfd, name, r.Mode&0o7777); err != nil {
				return err
			}
			rep.Dir = dirAttr(dfd)
			fd, errno := resolveAt(dfd, name, unix.O_PATH|unix.O_NOFOLLOW, 0)
			if errno != 0 {
				return errno
			}
			defer unix.Close(fd)
			owner(fd, &r)
			var st unix.Stat_t
			if err := unix.Fstat(fd, &st); err != nil {
				return err
			}
			rep.Attr = *AttrOf(&st)
			return nil
		})
		if errno != 0 {
			return errno, nil
		}
		return 0, &rep
	case proto.OpUnlink, proto.OpRmdir:
		var r proto.RemoveReq
		if proto.Unmarshal(b, &r) != nil {
			return unix.EINVAL, nil
		}
		e, errno := cn.export(r.Export, r.Path, true)
		if errno != 0 {
			return errno, nil
		}
		flags := 0
		if op == proto.OpRmdir {
			flags = unix.AT_REMOVEDIR
		}
		var dir proto.Attr
		errno = e.atParent(r.Path, &r.Caller, func(dfd int, name string) error {
			if errno := sameAt(dfd, name, r.Dev, r.Ino); errno != 0 {
				return errno
			}
			if err := unix.Unlinkat(dfd, name, flags); err != nil {
				return err
			}
			dir = dirAttr(dfd)
			return nil
		})
		if errno != 0 {
			return errno, nil
		}
		return 0, &dir
	case proto.OpRename:
		var r proto.RenameReq
		if proto.Unmarshal(b, &r) != nil {
			return unix.EINVAL, nil
		}
		e, errno := cn.export(r.Export, r.From, true)
		if errno != 0 {
			return errno, nil
		}
		if !proto.ValidPath(r.To) || r.To == "" {
			return unix.EINVAL, nil
		}
		if r.Flags&^(unix.RENAME_NOREPLACE|unix.RENAME_EXCHANGE) != 0 {
			return unix.EINVAL, nil
		}
		return e.atParent(r.From, nil, func(fdfd int, fname string) error {
			return errnoErr(e.atParent(r.To, &r.Caller, func(tdfd int, tname string) error {
				if errno := sameAt(fdfd, fname, r.Dev, r.Ino); errno != 0 {
					return errno
				}
				if errno := sameAt(tdfd, tname, r.ToDev, r.ToIno); errno != 0 && errno != unix.ENOENT {
					return errno
				}
				return unix.Renameat2(fdfd, fname, tdfd, tname, uint(r.Flags))
			}))
		}), nil
	case proto.OpLink:
		var r proto.LinkReq
		if proto.Unmarshal(b, &r) != nil {
			return unix.EINVAL, nil
		}
		e, errno := cn.export(r.Export, r.From, true)
		if errno != 0 {
			return errno, nil
		}
		if _, errno := cn.export(r.Export, r.To, true); errno != 0 {
			return errno, nil
		}
		if r.From == "" || r.To == "" {
			return unix.EINVAL, nil
		}
		// The checked file itself gets the new name: linkat of its O_PATH
		// descriptor (AT_EMPTY_PATH, which root may use), not of a path
		// that could name another file by now.
		pfd, st, errno := e.pathFD(r.From, r.Dev, r.Ino)
		if errno != 0 {
			return errno, nil
		}
		defer unix.Close(pfd)
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return unix.EPERM, nil
		}
		errno = e.atDir(r.To, r.DirDev, r.DirIno, &r.Caller, func(dfd int, name string) error {
			// AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH, which a
			// caller's credentials do not have.
			if asRoot && !switched(&r.Caller) {
				return unix.Linkat(pfd, "", dfd, name, unix.AT_EMPTY_PATH)
			}
			return unix.Linkat(unix.AT_FDCWD, "/proc/self/fd/"+strconv.Itoa(pfd), dfd, name, unix.AT_SYMLINK_FOLLOW)
		})
		if errno != 0 {
			return errno, nil
		}
		return fstat(pfd)
	case proto.OpFallocate:
		var r proto.FallocateReq
		if proto.Unmarshal(b, &r) != nil {
			return unix.EINVAL, nil
		}
		if r.Mode&^fallocateModes != 0 {
			return unix.EOPNOTSUPP, nil
		}
		h, release, errno := cn.acquire(r.Handle)
		if errno != 0 {
			return errno, nil
		}
		defer release()
		if h.dir {
			return unix.EISDIR, nil
		}
		if h.exp.ReadOnly {
			return unix.EROFS, nil
		}
		return errnoOf(unix.Fallocate(h.fd, r.Mode, int64(r.Offset), int64(r.Length))), nil
	}
	return unix.ENOSYS, nil
}

// fallocateModes are the fallocate(2) modes passed on; others (collapse,
// insert range, ...) are EOPNOTSUPP, as on a file system without them.
const fallocateModes = unix.FALLOC_FL_KEEP_SIZE | unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_ZERO_RANGE

// sameAt checks that name in dfd (not followed) is the file (dev, ino)
// the client checked permissions against, if ino is non-zero: a file
// swapped in since answers ESTALE, and the client's kernel looks the name
// up again. (A swap between this check and the operation is not caught:
// Linux has no unlink or rename by identity.)
func sameAt(dfd int, name string, dev, ino uint64) unix.Errno {
	if ino == 0 {
		return 0
	}
	var st unix.Stat_t
	if err := unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return errnoOf(err)
	}
	if st.Dev != dev || st.Ino != ino {
		return unix.ESTALE
	}
	return 0
}

// testHookIO, set by tests only, runs between finding a handle and using
// its descriptor.
var testHookIO func()

func errnoErr(e unix.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}

// pathReq decodes a PathReq and finds its export.
func (cn *conn) pathReq(b []byte, r *proto.PathReq, write bool) (*export, unix.Errno) {
	if proto.Unmarshal(b, r) != nil {
		return nil, unix.EINVAL
	}
	return cn.export(r.Export, r.Path, write)
}

// export finds an export and checks the path's form; write requests to a
// read-only export fail with EROFS.
func (cn *conn) export(name, path string, write bool) (*export, unix.Errno) {
	e, ok := cn.s.exports[name]
	if !ok {
		return nil, unix.ENOENT
	}
	if !proto.ValidPath(path) {
		// ".." or an absolute path: an attempt to leave the export.
		if strings.Contains("/"+path+"/", "/../") || strings.HasPrefix(path, "/") {
			return nil, unix.EACCES
		}
		return nil, unix.EINVAL
	}
	if write && e.ReadOnly {
		return nil, unix.EROFS
	}
	return e, 0
}

// open resolves path beneath the export's root and opens it, without
// following a symlink in its last component (with O_PATH, the descriptor
// is the link's). A path that would leave the export (a symlink pointing
// outside, a magic link) fails with EACCES: openat2 reports EXDEV, which
// would only confuse.
func (e *export) open(path string, flags int, mode uint32) (int, unix.Errno) {
	return e.resolve(path, flags|unix.O_NOFOLLOW, mode)
}

// resolve is open following a symlink in the last component too (as long
// as it stays beneath the root).
func (e *export) resolve(path string, flags int, mode uint32) (int, unix.Errno) {
	return resolveAt(e.root, path, flags, mode)
}

// resolveAt opens path beneath the directory dirfd.
func resolveAt(dirfd int, path string, flags int, mode uint32) (int, unix.Errno) {
	if path == "" {
		path = "."
	}
	how := unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Mode: uint64(mode), Resolve: resolveHow}
	for range 8 {
		fd, err := unix.Openat2(dirfd, path, &how)
		switch err {
		case nil:
			return fd, 0
		case unix.EAGAIN, unix.EINTR: // a concurrent rename: try again
			continue
		case unix.EXDEV:
			return -1, unix.EACCES
		}
		return -1, errnoOf(err)
	}
	return -1, unix.EAGAIN
}

// atParent runs f with an open directory descriptor of path's parent
// (resolved beneath the root) and path's last name. The path is resolved
// as the node's root; f runs with the caller's credentials (asCaller; as
// root if caller is nil): the client's kernel checked the search
// permissions of the path, and a process may work in a directory whose
// ancestors it cannot search (its working directory), so the node checks
// the operation itself, as the local kernel would.
func (e *export) atParent(path string, caller *proto.Cred, f func(dfd int, name string) error) unix.Errno {
	if path == "" {
		return unix.EBUSY // the export's root itself
	}
	dir, name := "", path
	if i := strings.LastIndexByte(path, '/'); i >= 0 {
		dir, name = path[:i], path[i+1:]
	}
	dfd, errno := e.resolve(dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if errno != 0 {
		return errno
	}
	defer unix.Close(dfd)
	e.squash(caller) // the caller's later uses in the op see it too
	return asCaller(caller, func() unix.Errno { return errnoOf(f(dfd, name)) })
}

// atDir is atParent for an operation that adds a name to the parent: if
// dirIno is non-zero, the parent must be the directory (dirDev, dirIno)
// whose write permission the client checked, else ESTALE.
func (e *export) atDir(path string, dirDev, dirIno uint64, caller *proto.Cred, f func(dfd int, name string) error) unix.Errno {
	return e.atParent(path, caller, func(dfd int, name string) error {
		if dirIno != 0 {
			var st unix.Stat_t
			if err := unix.Fstat(dfd, &st); err != nil {
				return err
			}
			if st.Dev != dirDev || st.Ino != dirIno {
				return unix.ESTALE
			}
		}
		return f(dfd, name)
	})
}

func (cn *conn) open(e *export, r *proto.OpenReq, create bool) (unix.Errno, proto.Msg) {
	flags := int(r.Flags) & openFlags
	acc := flags & unix.O_ACCMODE
	if e.ReadOnly && (acc != unix.O_RDONLY || flags&unix.O_TRUNC != 0 || create) {
		return unix.EROFS, nil
	}
	if r.Path == "" && create {
		return unix.EEXIST, nil
	}
	var fd int
	var errno unix.Errno
	var dir proto.Attr
	if create {
		// Try to create; if the file exists (and O_EXCL was not asked
		// for) open it. Only a file created here gets the mode exactly
		// (the client's kernel already applied the caller's umask).
		errno = e.atDir(r.Path, r.DirDev, r.DirIno, &r.Caller, func(dfd int, name string) error {
			var errno unix.Errno
			fd, errno = resolveAt(dfd, name, flags|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW, r.Mode&0o7777)
			if errno == 0 {
				dir = dirAttr(dfd)
			}
			return errnoErr(errno)
		})
		if errno == 0 {
			owner(fd, r)
			_ = unix.Fchmod(fd, r.Mode&0o7777)
		} else if errno == unix.EEXIST && flags&unix.O_EXCL == 0 {
			// The client's kernel found no file there, so it checked no
			// permission on one: a file that appeared since is checked
			// by this kernel when it is opened, with the caller's
			// credentials (asCaller).
			fd, errno = e.openFile(r.Path, flags, 0, 0, &r.Caller)
		}
	} else {
		fd, errno = e.openFile(r.Path, flags, r.Dev, r.Ino, &r.Caller)
	}
	if errno != 0 {
		return errno, nil
	}
	errno, a := fstat(fd)
	if errno != 0 {
		unix.Close(fd)
		return errno, nil
	}
	attr := *a.(*proto.Attr)
	id, errno := cn.addHandle(&handle{fd: fd, exp: e})
	if errno != 0 {
		unix.Close(fd)
		return errno, nil
	}
	return 0, &proto.HandleReply{Handle: id, Attr: attr, Dir: dir}
}

// dirAttr is the attributes of the directory dfd after a change in it,
// for the client to answer the kernel's next getattr of it without
// asking again; zero (Ino 0: not given) if fstat fails.
func dirAttr(dfd int) proto.Attr {
	var st unix.Stat_t
	if unix.Fstat(dfd, &st) != nil {
		return proto.Attr{}
	}
	return *AttrOf(&st)
}

// pathFD opens path's last component itself (O_PATH, a symlink not
// followed) and checks it is the file (dev, ino) if ino is non-zero: the
// file the client checked permissions against. Another file there (one
// swapped in since) is ESTALE.
func (e *export) pathFD(path string, dev, ino uint64) (int, *unix.Stat_t, unix.Errno) {
	fd, errno := e.open(path, unix.O_PATH, 0)
	if errno != 0 {
		return -1, nil, errno
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, nil, errnoOf(err)
	}
	if ino != 0 && (st.Dev != dev || st.Ino != ino) {
		unix.Close(fd)
		return -1, nil, unix.ESTALE
	}
	return fd, &st, 0
}

// openFile opens an existing regular file or directory (a directory only
// for reading) at path, checking its identity as pathFD does. Anything
// else is refused before it is opened: a symlink (ELOOP), a FIFO, socket
// or device (ENXIO), whose open could block or have effects.
func (e *export) openFile(path string, flags int, dev, ino uint64, caller *proto.Cred) (int, unix.Errno) {
	pfd, st, errno := e.pathFD(path, dev, ino)
	if errno != 0 {
		return -1, errno
	}
	defer unix.Close(pfd)
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
	case unix.S_IFDIR:
		if flags&unix.O_ACCMODE != unix.O_RDONLY || flags&unix.O_TRUNC != 0 {
			return -1, unix.EISDIR
		}
	case unix.S_IFLNK:
		return -1, unix.ELOOP
	default:
		return -1, unix.ENXIO
	}
	// Found as root; opened as the caller (its permission checked).
	e.squash(caller)
	fd := -1
	errno = asCaller(caller, func() unix.Errno {
		var errno unix.Errno
		fd, errno = reopen(pfd, flags)
		return errno
	})
	return fd, errno
}

// reopen opens the file an O_PATH descriptor names (by its /proc link:
// the same file, wherever it is now).
func reopen(pfd int, flags int) (int, unix.Errno) {
	for {
		fd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(pfd), flags|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
		if err == unix.EINTR {
			continue
		}
		return fd, errnoOf(err)
	}
}

// owner gives what create or mkdir made as root to the caller on the
// client (root with another group); made with the caller's credentials it
// is the caller's already, and an unprivileged server leaves it its own.
func owner(fd int, r *proto.OpenReq) {
	if asRoot && !switched(&r.Caller) && (r.Caller.UID != 0 || r.Caller.GID != 0) {
		_ = unix.Fchownat(fd, "", int(r.Caller.UID), int(r.Caller.GID), unix.AT_EMPTY_PATH)
	}
}

func fileIO(op proto.Op, h *handle, r *proto.IOReq) (unix.Errno, proto.Msg) {
	switch op {
	case proto.OpRead:
		frame := make([]byte, proto.DataReplyOffset+int(r.Size))
		buf := frame[proto.DataReplyOffset:]
		n := 0
		for n < len(buf) {
			m, err := unix.Pread(h.fd, buf[n:], int64(r.Offset)+int64(n))
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return errnoOf(err), nil
			}
			if m == 0 {
				break
			}
			n += m
		}
		return 0, &dataReply{frame: frame, n: n}
	case proto.OpWrite:
		if h.exp.ReadOnly {
			return unix.EROFS, nil
		}
		n := 0
		for n < len(r.Data) {
			// With O_APPEND, Linux pwrite appends whatever the offset:
			// appends from several clients stay whole.
			m, err := unix.Pwrite(h.fd, r.Data[n:], int64(r.Offset)+int64(n))
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				if n > 0 {
					break
				}
				return errnoOf(err), nil
			}
			n += m
		}
		return 0, &proto.Count{N: uint32(n)}
	case proto.OpFsync:
		var err error
		if r.Size == 1 {
			err = unix.Fdatasync(h.fd)
		} else {
			err = unix.Fsync(h.fd)
		}
		return errnoOf(err), nil
	}
	return unix.ENOSYS, nil
}

func (cn *conn) setattr(e *export, r *proto.SetattrReq) (unix.Errno, proto.Msg) {
	// Either an open handle of this export, or a path: never one for the
	// other.
	var fd int
	var h *handle
	var st *unix.Stat_t
	if r.Handle != 0 {
		if r.Path != "" {
			return unix.EINVAL, nil
		}
		var release func()
		var errno unix.Errno
		if h, release, errno = cn.acquire(r.Handle); errno != 0 {
			return errno, nil
		}
		defer release()
		if h.exp != e {
			return unix.EBADF, nil
		}
		fd = h.fd
	} else {
		var errno unix.Errno
		if fd, st, errno = e.pathFD(r.Path, r.Dev, r.Ino); errno != 0 {
			return errno, nil
		}
		defer unix.Close(fd)
	}
	// Resolved as the node's root (the client's kernel checked the
	// search permissions of the path); changed with the caller's
	// credentials, so the node's kernel checks ownership and access too.
	e.squash(&r.Caller)
	return runAs(&r.Caller, func() (unix.Errno, proto.Msg) { return applySetattr(fd, h, st, r) })
}

// applySetattr changes the attributes of fd (h's if h is set, else the
// file st describes).
func applySetattr(fd int, h *handle, st *unix.Stat_t, r *proto.SetattrReq) (unix.Errno, proto.Msg) {
	if r.Valid&proto.SetSize != 0 {
		var errno unix.Errno
		switch {
		case h != nil && h.dir:
			errno = unix.EISDIR
		case h != nil:
			errno = errnoOf(unix.Ftruncate(h.fd, int64(r.Size)))
		case st.Mode&unix.S_IFMT == unix.S_IFDIR:
			errno = unix.EISDIR
		case st.Mode&unix.S_IFMT != unix.S_IFREG:
			errno = unix.EINVAL
		default:
			// Truncate the file checked above, wherever it is now.
			wfd, werr := reopen(fd, unix.O_WRONLY)
			if werr != 0 {
				return werr, nil
			}
			errno = errnoOf(unix.Ftruncate(wfd, int64(r.Size)))
			unix.Close(wfd)
		}
		if errno != 0 {
			return errno, nil
		}
	}
	if r.Valid&proto.SetMode != 0 && st != nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
		return unix.EOPNOTSUPP, nil // a symlink's mode cannot change (lchmod)
	}
	// The descriptor was resolved beneath the root, so acting on it by its
	// /proc/self/fd link or with AT_EMPTY_PATH cannot leave the export.
	if r.Valid&proto.SetMode != 0 {
		if err := unix.Fchmodat(unix.AT_FDCWD, "/proc/self/fd/"+strconv.Itoa(fd), r.Mode&0o7777, 0); err != nil {
			return errnoOf(err), nil
		}
	}
	if r.Valid&proto.SetOwner != 0 {
		if err := unix.Fchownat(fd, "", int(int32(r.UID)), int(int32(r.GID)), unix.AT_EMPTY_PATH); err != nil {
			return errnoOf(err), nil
		}
	}
	if r.Valid&(proto.SetAtime|proto.SetAtimeNow|proto.SetMtime|proto.SetMtimeNow) != 0 {
		ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
		for i, t := range []struct {
			set, now uint32
			v        proto.Timespec
		}{{proto.SetAtime, proto.SetAtimeNow, r.Atime}, {proto.SetMtime, proto.SetMtimeNow, r.Mtime}} {
			switch {
			case r.Valid&t.now != 0:
				ts[i] = unix.Timespec{Nsec: unix.UTIME_NOW}
			case r.Valid&t.set != 0:
				ts[i] = unix.Timespec{Sec: t.v.Sec, Nsec: int64(t.v.Nsec)}
			}
		}
		if err := unix.UtimesNanoAt(fd, "", ts, unix.AT_EMPTY_PATH); err != nil {
			return errnoOf(err), nil
		}
	}
	return fstat(fd)
}

func fstat(fd int) (unix.Errno, proto.Msg) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return errnoOf(err), nil
	}
	return 0, AttrOf(&st)
}

// AttrOf converts a stat result.
func AttrOf(st *unix.Stat_t) *proto.Attr {
	return &proto.Attr{
		Dev: st.Dev, Ino: st.Ino, Size: uint64(st.Size), Blocks: uint64(st.Blocks),
		Atime: proto.Timespec{Sec: st.Atim.Sec, Nsec: uint32(st.Atim.Nsec)},
		Mtime: proto.Timespec{Sec: st.Mtim.Sec, Nsec: uint32(st.Mtim.Nsec)},
		Ctime: proto.Timespec{Sec: st.Ctim.Sec, Nsec: uint32(st.Ctim.Nsec)},
		Mode:  st.Mode, Nlink: uint32(st.Nlink), UID: st.Uid, GID: st.Gid, Rdev: uint32(st.Rdev), Blksize: uint32(st.Blksize),
	}
}

// readdir returns the next batch of entries of an open directory (at most
// what one getdents64 call of 64 KiB yields), empty at the end.
func readdir(h *handle) (unix.Errno, proto.Msg) {
	h.dmu.Lock()
	defer h.dmu.Unlock()
	var st unix.Stat_t
	if err := unix.Fstat(h.fd, &st); err != nil {
		return errnoOf(err), nil
	}
	buf := make([]byte, 64<<10)
	l := proto.DirList{Dev: st.Dev}
	for len(l.Entries) == 0 {
		n, err := unix.Getdents(h.fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return errnoOf(err), nil
		}
		if n == 0 {
			break
		}
		b := buf[:n]
		for len(b) >= 19 {
			// struct linux_dirent64: ino u64, off s64, reclen u16, type u8, name.
			ino := binary.NativeEndian.Uint64(b)
			reclen := int(binary.NativeEndian.Uint16(b[16:]))
			if reclen < 19 || reclen > len(b) {
				return unix.EIO, nil
			}
			typ := b[18]
			name := b[19:reclen]
			if i := indexNUL(name); i >= 0 {
				name = name[:i]
			}
			b = b[reclen:]
			if nm := string(name); proto.ValidName(nm) {
				l.Entries = append(l.Entries, proto.DirEntry{Name: nm, Mode: dtToMode(typ), Ino: ino})
			}
		}
	}
	return 0, &l
}

func indexNUL(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return -1
}

func dtToMode(t uint8) uint32 {
	switch t {
	case unix.DT_DIR:
		return unix.S_IFDIR
	case unix.DT_LNK:
		return unix.S_IFLNK
	case unix.DT_UNKNOWN:
		// Only a lookup finds out: "unknown" makes programs that trust
		// d_type (find, fts) ask.
		return 0
	case unix.DT_FIFO:
		return unix.S_IFIFO
	case unix.DT_SOCK:
		return unix.S_IFSOCK
	case unix.DT_CHR:
		return unix.S_IFCHR
	case unix.DT_BLK:
		return unix.S_IFBLK
	}
	return unix.S_IFREG
}

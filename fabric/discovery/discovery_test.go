package discovery

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/mdns"
	"github.com/miekg/dns"
)

var validPeer = Peer{
	Node:       "node1",
	ClusterID:  "0123456789abcdef",
	FabricAddr: "10.0.0.1:7443",
	GossipAddr: "10.0.0.1:7946",
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// txtWith returns validPeer's TXT with key's entry replaced by entry ("" drops it).
func txtWith(key, entry string) []string {
	var out []string
	for _, e := range validPeer.TXT() {
		if strings.HasPrefix(e, key+"=") {
			if entry != "" {
				out = append(out, entry)
			}
			continue
		}
		out = append(out, e)
	}
	return out
}

func TestParseTXTValid(t *testing.T) {
	tests := []struct {
		name string
		txt  []string
		want Peer
	}{
		{"canonical", validPeer.TXT(), validPeer},
		{"any order", []string{"gossip=10.0.0.1:7946", "fabric=10.0.0.1:7443", "cluster=0123456789abcdef", "node=node1"}, validPeer},
		{"uppercase cluster is lowered", txtWith("cluster", "cluster=0123456789ABCDEF"), validPeer},
		{"node charset", txtWith("node", "node=a-b_c.D9"), Peer{Node: "a-b_c.D9", ClusterID: validPeer.ClusterID, FabricAddr: validPeer.FabricAddr, GossipAddr: validPeer.GossipAddr}},
		{"node 63 chars", txtWith("node", "node="+strings.Repeat("n", 63)), Peer{Node: strings.Repeat("n", 63), ClusterID: validPeer.ClusterID, FabricAddr: validPeer.FabricAddr, GossipAddr: validPeer.GossipAddr}},
		{"cluster 1 digit", txtWith("cluster", "cluster=f"), Peer{Node: "node1", ClusterID: "f", FabricAddr: validPeer.FabricAddr, GossipAddr: validPeer.GossipAddr}},
		{"cluster 64 digits", txtWith("cluster", "cluster="+strings.Repeat("a", 64)), Peer{Node: "node1", ClusterID: strings.Repeat("a", 64), FabricAddr: validPeer.FabricAddr, GossipAddr: validPeer.GossipAddr}},
		{"ipv6", txtWith("fabric", "fabric=[fd00::1]:1"), Peer{Node: "node1", ClusterID: validPeer.ClusterID, FabricAddr: "[fd00::1]:1", GossipAddr: validPeer.GossipAddr}},
		{"host name", txtWith("gossip", "gossip=node1.lan:65535"), Peer{Node: "node1", ClusterID: validPeer.ClusterID, FabricAddr: validPeer.FabricAddr, GossipAddr: "node1.lan:65535"}},
		{"loopback", txtWith("fabric", "fabric=127.0.0.1:7443"), Peer{Node: "node1", ClusterID: validPeer.ClusterID, FabricAddr: "127.0.0.1:7443", GossipAddr: validPeer.GossipAddr}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseTXT(tt.txt)
			if err != nil {
				t.Fatalf("ParseTXT(%q): %v", tt.txt, err)
			}
			if got != tt.want {
				t.Fatalf("ParseTXT(%q) = %+v, want %+v", tt.txt, got, tt.want)
			}
		})
	}
}

func TestParseTXTInvalid(t *testing.T) {
	tests := []struct {
		name string
		txt  []string
		want string // substring of the error
	}{
		{"nil", nil, "missing key(s) node, cluster, fabric, gossip"},
		{"empty entry", append(validPeer.TXT(), ""), "not key=value"},
		{"no equals", append(validPeer.TXT(), "garbage"), "not key=value"},
		{"unknown key", append(validPeer.TXT(), "version=1"), `unknown key "version"`},
		{"uppercase key", txtWith("node", "NODE=node1"), `unknown key "NODE"`},
		{"key with space", txtWith("node", "node =node1"), `unknown key "node "`},
		{"duplicate key", append(validPeer.TXT(), "node=node2"), `duplicate key "node"`},
		{"duplicate identical", append(validPeer.TXT(), "gossip=10.0.0.1:7946"), `duplicate key "gossip"`},
		{"missing node", txtWith("node", ""), "missing key(s) node"},
		{"missing cluster", txtWith("cluster", ""), "missing key(s) cluster"},
		{"missing fabric", txtWith("fabric", ""), "missing key(s) fabric"},
		{"missing gossip", txtWith("gossip", ""), "missing key(s) gossip"},
		{"empty node", txtWith("node", "node="), "must be 1-63"},
		{"long node", txtWith("node", "node="+strings.Repeat("n", 64)), "must be 1-63"},
		{"node bad char", txtWith("node", "node=a b"), "only letters"},
		{"node slash", txtWith("node", "node=../etc"), "only letters"},
		{"node leading dash", txtWith("node", "node=-x"), "starting with a letter or digit"},
		{"node non-ascii", txtWith("node", "node=nödé"), "only letters"},
		{"node NUL", txtWith("node", "node=a\x00"), "only letters"},
		{"empty cluster", txtWith("cluster", "cluster="), "must be 1-64"},
		{"long cluster", txtWith("cluster", "cluster="+strings.Repeat("a", 65)), "must be 1-64"},
		{"cluster not hex", txtWith("cluster", "cluster=xyz"), "not hex"},
		{"empty fabric", txtWith("fabric", "fabric="), "not host:port"},
		{"no port", txtWith("fabric", "fabric=10.0.0.1"), "missing port"},
		{"port zero", txtWith("fabric", "fabric=10.0.0.1:0"), "port must be"},
		{"port too big", txtWith("fabric", "fabric=10.0.0.1:65536"), "port must be"},
		{"port negative", txtWith("fabric", "fabric=10.0.0.1:-1"), "port must be"},
		{"port plus", txtWith("fabric", "fabric=10.0.0.1:+80"), "port must be"},
		{"port leading zero", txtWith("fabric", "fabric=10.0.0.1:080"), "port must be"},
		{"port name", txtWith("gossip", "gossip=10.0.0.1:http"), "port must be"},
		{"port empty", txtWith("gossip", "gossip=10.0.0.1:"), "port must be"},
		{"missing host", txtWith("gossip", "gossip=:7946"), "missing host"},
		{"unspecified v4", txtWith("gossip", "gossip=0.0.0.0:7946"), "unspecified"},
		{"unspecified v6", txtWith("gossip", "gossip=[::]:7946"), "unspecified"},
		{"multicast", txtWith("gossip", "gossip=224.0.0.251:5353"), "multicast"},
		{"zone", txtWith("gossip", "gossip=[fe80::1%eth0]:7946"), "zone"},
		{"unbracketed v6", txtWith("gossip", "gossip=fd00::1:7946"), "too many colons"},
		{"bracketed v4", txtWith("gossip", "gossip=[10.0.0.1]:7946"), "brackets"},
		{"bad v6", txtWith("gossip", "gossip=[fd00::zz]:7946"), "bad IPv6"},
		{"bad host", txtWith("gossip", "gossip=ho_st:7946"), "only letters"},
		{"host dash", txtWith("gossip", "gossip=-host:7946"), "start or end"},
		{"host empty label", txtWith("gossip", "gossip=a..b:7946"), "labels must be 1-63"},
		{"bad ipv4", txtWith("gossip", "gossip=999.1.1.1:7946"), "numeric label"},
		{"host space", txtWith("gossip", "gossip=a b:7946"), "only letters"},
		{"entry too long", txtWith("gossip", "gossip="+strings.Repeat("a", 300)), "more than 255"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := ParseTXT(tt.txt)
			if err == nil {
				t.Fatalf("ParseTXT(%q) = %+v, want error containing %q", tt.txt, p, tt.want)
			}
			if !errors.Is(err, ErrBadTXT) {
				t.Errorf("error %v does not wrap ErrBadTXT", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
			if p != (Peer{}) {
				t.Errorf("ParseTXT returned %+v with an error", p)
			}
		})
	}
}

func TestParseTXTErrorIsBounded(t *testing.T) {
	_, err := ParseTXT([]string{strings.Repeat("\x01", 255)})
	if err == nil || len(err.Error()) > 400 {
		t.Fatalf("error for hostile input should exist and stay short: %v", err)
	}
}

func FuzzParseTXT(f *testing.F) {
	f.Add(strings.Join(validPeer.TXT(), "\n"))
	f.Add("node=a\ncluster=F\nfabric=[::1]:1\ngossip=h.example:65535")
	f.Add("node=a\nnode=b")
	f.Add("=\n==\nnode")
	f.Add("fabric=[fe80::1%25eth0]:80\ngossip=[1.2.3.4]:0")
	f.Fuzz(func(t *testing.T, s string) {
		txt := strings.Split(s, "\n")
		p, err := ParseTXT(txt)
		if err != nil {
			if !errors.Is(err, ErrBadTXT) {
				t.Fatalf("error %v does not wrap ErrBadTXT", err)
			}
			return
		}
		// Accepted input must re-encode to something that parses back the same.
		q, err := ParseTXT(p.TXT())
		if err != nil || q != p {
			t.Fatalf("round trip of %+v: %+v, %v", p, q, err)
		}
		if len(txt) != 4 {
			t.Fatalf("accepted %d entries", len(txt))
		}
		if p.ClusterID != strings.ToLower(p.ClusterID) {
			t.Fatalf("cluster id %q not lowercased", p.ClusterID)
		}
	})
}

func TestAnnounceRejectsInvalidPeer(t *testing.T) {
	bad := validPeer
	bad.FabricAddr = "0.0.0.0:7443"
	a, err := Announce(AnnounceConfig{Peer: bad, Logger: quietLogger()})
	if err == nil {
		a.Close()
		t.Fatal("Announce accepted an unspecified fabric address")
	}
	if !errors.Is(err, ErrBadTXT) || !strings.Contains(err.Error(), "fabric") {
		t.Fatalf("unclear error: %v", err)
	}
}

func TestBrowseRejectsBadClusterID(t *testing.T) {
	_, err := Browse(context.Background(), BrowseConfig{ClusterID: "not-hex"})
	if err == nil || !strings.Contains(err.Error(), "not hex") {
		t.Fatalf("Browse with a bad cluster id: %v", err)
	}
}

func TestBrowseCanceledContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	_, err := Browse(ctx, BrowseConfig{ClusterID: "abc", Timeout: time.Minute})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Browse with a canceled context: %v", err)
	}
	if time.Since(start) > time.Second {
		t.Fatalf("Browse took %v with a canceled context", time.Since(start))
	}
}

// response builds the packet hashicorp/mdns's responder sends for a PTR query
// of the service, for the given announcement.
func response(t *testing.T, p Peer) []byte {
	t.Helper()
	instance := strings.ReplaceAll(p.Node, ".", `\.`)
	ips, err := announceIPs(p, nil)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := mdns.NewMDNSService(instance, ServiceName, domain, hostName(p), fabricPort(p), ips, p.TXT())
	if err != nil {
		t.Fatal(err)
	}
	m := &dns.Msg{
		MsgHdr:   dns.MsgHdr{Response: true, Authoritative: true},
		Compress: true,
		Answer:   svc.Records(dns.Question{Name: serviceFQDN, Qtype: dns.TypePTR, Qclass: dns.ClassINET}),
	}
	if len(m.Answer) == 0 {
		t.Fatal("responder has no records for the service")
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatalf("packing the response for %+v: %v", p, err)
	}
	return b
}

func TestCollect(t *testing.T) {
	long := Peer{
		Node:       strings.Repeat("n", 30) + "." + strings.Repeat("m", 32), // 63 chars, with a dot
		ClusterID:  strings.Repeat("a", 64),
		FabricAddr: "[fd00::1]:7443",
		GossipAddr: strings.Repeat("h", 63) + ".example:7946",
	}
	other := validPeer
	other.Node, other.ClusterID = "node9", "ffff"
	src := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 5353}

	found := map[Peer]struct{}{}
	for _, p := range []Peer{validPeer, long, other, validPeer} {
		collect(response(t, p), src, "", found, quietLogger())
	}
	collect([]byte("garbage"), src, "", found, quietLogger())
	// A query (not a response) carrying a valid TXT must be ignored.
	q := new(dns.Msg)
	q.SetQuestion(serviceFQDN, dns.TypePTR)
	q.Answer = []dns.RR{&dns.TXT{Hdr: dns.RR_Header{Name: "x." + serviceFQDN, Rrtype: dns.TypeTXT, Class: dns.ClassINET}, Txt: Peer{Node: "spoof", ClusterID: "1", FabricAddr: "1.1.1.1:1", GossipAddr: "1.1.1.1:2"}.TXT()}}
	b, _ := q.Pack()
	collect(b, src, "", found, quietLogger())
	// A TXT of another service must be ignored; an invalid one too.
	r := &dns.Msg{MsgHdr: dns.MsgHdr{Response: true}, Answer: []dns.RR{
		&dns.TXT{Hdr: dns.RR_Header{Name: "x._http._tcp.local.", Rrtype: dns.TypeTXT, Class: dns.ClassINET}, Txt: Peer{Node: "web", ClusterID: "1", FabricAddr: "1.1.1.1:1", GossipAddr: "1.1.1.1:2"}.TXT()},
		&dns.TXT{Hdr: dns.RR_Header{Name: "bad._ONEBOX._tcp.local.", Rrtype: dns.TypeTXT, Class: dns.ClassINET}, Txt: []string{"node=bad"}},
	}}
	b, _ = r.Pack()
	collect(b, src, "", found, quietLogger())

	got := sortedPeers(found)
	want := []Peer{validPeer, other, long}
	slices.SortFunc(want, func(a, b Peer) int { return strings.Compare(a.Node, b.Node) })
	if !slices.Equal(got, want) {
		t.Fatalf("collected %+v, want %+v", got, want)
	}

	found = map[Peer]struct{}{}
	for _, p := range []Peer{validPeer, long, other} {
		collect(response(t, p), src, "ffff", found, quietLogger())
	}
	if got := sortedPeers(found); !slices.Equal(got, []Peer{other}) {
		t.Fatalf("cluster filter: got %+v", got)
	}
}

func TestSortedPeersEmptyIsNotNil(t *testing.T) {
	if got := sortedPeers(map[Peer]struct{}{}); got == nil || len(got) != 0 {
		t.Fatalf("sortedPeers(empty) = %#v, want empty non-nil slice", got)
	}
}

// talaria-estargz-convert: converts an image to eStargz with
// github.com/containerd/stargz-snapshotter/estargz and pushes it under a new reference, for
// Talaria's head-to-head startup benchmark (issue 25). It stands in for upstream's
// `ctr-remote image optimize`, which is in the unpublished cmd module:
//
//	talaria-estargz-convert [flags] SRC DST
//
// SRC is a registry reference or oci-layout:DIR (the first image of the layout's index.json); DST
// is a registry reference. Each layer is rebuilt as an eStargz blob (gzip, OCI layer media type,
// with the TOC digest and uncompressed size annotations stargz reads); the image config is kept,
// with the new diff IDs. -prioritized-files FILE lists paths (one a line, as a recorded start read
// them) that each layer puts first, ahead of the prefetch landmark, as `optimize` does with the
// files its analyzer saw; without it, layers get the no-prefetch landmark (a plain conversion, as
// `ctr-remote image convert --estargz` or `nerdctl image convert --estargz` make).
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Set by hack/tools.sh (-X main.stargzVersion=...).
var stargzVersion = "unknown"

func main() {
	prioritized := flag.String("prioritized-files", "", "file listing paths to put first in each layer (one a line; # comments)")
	insecure := flag.Bool("insecure", false, "allow plain HTTP to the registries")
	level := flag.Int("compression-level", 9, "gzip level (estargz's default: 9, best compression)")
	chunk := flag.Int("chunk-size", 0, "eStargz chunk size in bytes (0: estargz's default)")
	tmp := flag.String("tmp", "", "directory for the temporary layer files (default: $TMPDIR)")
	version := flag.Bool("version", false, "print the version and exit")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: talaria-estargz-convert [flags] SRC DST\n  SRC: registry reference or oci-layout:DIR; DST: registry reference")
		flag.PrintDefaults()
	}
	flag.Parse()
	if *version {
		fmt.Println("talaria-estargz-convert (stargz-snapshotter", stargzVersion+")")
		return
	}
	if flag.NArg() != 2 {
		flag.Usage()
		os.Exit(2)
	}
	var files []string
	if *prioritized != "" {
		var err error
		if files, err = readList(*prioritized); err != nil {
			fatal(err)
		}
	}
	c := converter{
		ctx:   context.Background(),
		files: files,
		level: *level,
		chunk: *chunk,
		tmp:   *tmp,
	}
	if *insecure {
		c.nameOpts = append(c.nameOpts, name.Insecure)
	}
	if err := c.run(flag.Arg(0), flag.Arg(1)); err != nil {
		fatal(err)
	}
}

type converter struct {
	ctx      context.Context
	files    []string
	level    int
	chunk    int
	tmp      string
	nameOpts []name.Option
}

func (c *converter) remoteOpts() []remote.Option {
	return []remote.Option{
		remote.WithContext(c.ctx),
		remote.WithAuthFromKeychain(authn.DefaultKeychain),
		remote.WithPlatform(v1.Platform{OS: "linux", Architecture: runtime.GOARCH}),
	}
}

func (c *converter) source(src string) (v1.Image, error) {
	if dir, ok := strings.CutPrefix(src, "oci-layout:"); ok {
		idx, err := layout.ImageIndexFromPath(dir)
		if err != nil {
			return nil, err
		}
		m, err := idx.IndexManifest()
		if err != nil {
			return nil, err
		}
		if len(m.Manifests) == 0 {
			return nil, fmt.Errorf("%s: no manifests in index.json", dir)
		}
		return idx.Image(m.Manifests[0].Digest)
	}
	ref, err := name.ParseReference(src, c.nameOpts...)
	if err != nil {
		return nil, err
	}
	return remote.Image(ref, c.remoteOpts()...)
}

func (c *converter) run(src, dst string) error {
	img, err := c.source(src)
	if err != nil {
		return fmt.Errorf("source %s: %w", src, err)
	}
	dstRef, err := name.ParseReference(dst, c.nameOpts...)
	if err != nil {
		return fmt.Errorf("destination %s: %w", dst, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	out := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	out = mutate.ConfigMediaType(out, types.OCIConfigJSON)
	for i, l := range layers {
		nl, toc, usize, missed, err := c.convertLayer(l)
		if err != nil {
			return fmt.Errorf("layer %d: %w", i, err)
		}
		// Pushed now, so only one layer's files are on disk at a time; remote.Write below finds
		// the blob there and does not open it again.
		if err := remote.WriteLayer(dstRef.Context(), nl, c.remoteOpts()...); err != nil {
			nl.remove()
			return fmt.Errorf("layer %d: push: %w", i, err)
		}
		nl.remove()
		d, _ := nl.Digest()
		fmt.Fprintf(os.Stderr, "layer %d: %s -> %s (%d bytes, toc %s, %d of %d prioritized paths not in it)\n",
			i, digestOf(l), d, nl.size, toc, len(missed), len(c.files))
		out, err = mutate.Append(out, mutate.Addendum{
			Layer: nl,
			Annotations: map[string]string{
				estargz.TOCJSONDigestAnnotation:         toc,
				estargz.StoreUncompressedSizeAnnotation: strconv.FormatInt(usize, 10),
			},
		})
		if err != nil {
			return err
		}
	}
	ncf, err := out.ConfigFile()
	if err != nil {
		return err
	}
	keep := cf.DeepCopy()
	keep.RootFS.DiffIDs = ncf.RootFS.DiffIDs
	if out, err = mutate.ConfigFile(out, keep); err != nil {
		return err
	}
	if err := remote.Write(dstRef, out, c.remoteOpts()...); err != nil {
		return fmt.Errorf("push %s: %w", dst, err)
	}
	d, err := out.Digest()
	if err != nil {
		return err
	}
	fmt.Printf("%s@%s\n", dstRef.Context(), d)
	return nil
}

func digestOf(l v1.Layer) string {
	d, err := l.Digest()
	if err != nil {
		return "?"
	}
	return d.String()
}

// convertLayer rebuilds one layer as eStargz into a temporary file.
func (c *converter) convertLayer(l v1.Layer) (*fileLayer, string, int64, []string, error) {
	in, err := os.CreateTemp(c.tmp, "estargz-in-*")
	if err != nil {
		return nil, "", 0, nil, err
	}
	defer func() { in.Close(); os.Remove(in.Name()) }()
	rc, err := l.Compressed()
	if err != nil {
		return nil, "", 0, nil, err
	}
	n, err := io.Copy(in, rc)
	rc.Close()
	if err != nil {
		return nil, "", 0, nil, err
	}
	var missed []string
	opts := []estargz.Option{
		estargz.WithContext(c.ctx),
		estargz.WithCompressionLevel(c.level),
	}
	if c.chunk > 0 {
		opts = append(opts, estargz.WithChunkSize(c.chunk))
	}
	if len(c.files) > 0 {
		opts = append(opts, estargz.WithPrioritizedFiles(c.files), estargz.WithAllowPrioritizeNotFound(&missed))
	}
	blob, err := estargz.Build(io.NewSectionReader(in, 0, n), opts...)
	if err != nil {
		return nil, "", 0, nil, err
	}
	outf, err := os.CreateTemp(c.tmp, "estargz-out-*")
	if err != nil {
		blob.Close()
		return nil, "", 0, nil, err
	}
	h := sha256.New()
	size, err := io.Copy(io.MultiWriter(outf, h), blob)
	if cerr := blob.Close(); err == nil {
		err = cerr
	}
	if cerr := outf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(outf.Name())
		return nil, "", 0, nil, err
	}
	usize, err := blob.UncompressedSize()
	if err != nil {
		os.Remove(outf.Name())
		return nil, "", 0, nil, err
	}
	diffID, err := v1.NewHash(blob.DiffID().String())
	if err != nil {
		os.Remove(outf.Name())
		return nil, "", 0, nil, err
	}
	fl := &fileLayer{
		path:   outf.Name(),
		digest: v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))},
		diffID: diffID,
		size:   size,
	}
	return fl, blob.TOCDigest().String(), usize, missed, nil
}

// fileLayer is a gzip layer in a file whose digests are known: go-containerregistry need not
// read it again to compute them.
type fileLayer struct {
	path           string
	digest, diffID v1.Hash
	size           int64
	removed        bool
}

func (f *fileLayer) Digest() (v1.Hash, error) { return f.digest, nil }
func (f *fileLayer) DiffID() (v1.Hash, error) { return f.diffID, nil }
func (f *fileLayer) Size() (int64, error)     { return f.size, nil }
func (f *fileLayer) MediaType() (types.MediaType, error) {
	return types.OCILayer, nil
}
func (f *fileLayer) Compressed() (io.ReadCloser, error) {
	if f.removed {
		return nil, errors.New("layer file already pushed and removed")
	}
	return os.Open(f.path)
}
func (f *fileLayer) Uncompressed() (io.ReadCloser, error) {
	l, err := partial.CompressedToLayer(f)
	if err != nil {
		return nil, err
	}
	return l.Uncompressed()
}
func (f *fileLayer) remove() {
	os.Remove(f.path)
	f.removed = true
}

func readList(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []string
	seen := map[string]bool{}
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") || seen[line] {
			continue
		}
		seen[line] = true
		out = append(out, line)
	}
	return out, nil
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "talaria-estargz-convert:", err)
	os.Exit(1)
}

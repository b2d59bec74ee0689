"""bangui-geo's public import for other BanGUI components: ``bangui_geo.client``.

The ``shared`` and ``services`` packages this distribution also installs are the services'
internals; they may change between releases. Import from here instead.
"""
